"""samdiffsr: SAM-DiffSR training, data and evaluation at cluster scale."""
