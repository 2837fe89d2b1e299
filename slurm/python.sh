# Sourced by the sbatch scripts (after REPO is set): choose and check the Python interpreter of the job.
#
# PYTHON (exported from the submitting shell, as sbatch does) names the interpreter samdiffsr is installed
# in; without it, `python` from PATH. One that cannot import samdiffsr (a venv that is not on the job's
# PATH, a system python) stops the job here with one line saying what to set, instead of failing in every
# task with ModuleNotFoundError.
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import samdiffsr' >/dev/null 2>&1; then
    echo "${SCRIPT:-sbatch}: '$PYTHON' cannot import samdiffsr: submit with PYTHON set to the interpreter it is" \
        "installed in, e.g. PYTHON=\$(command -v python) sbatch ..." >&2
    exit 2
fi
