"""Install samdiffsr: `pip install -e .` (add `[dev]` for the test tools)."""
from setuptools import find_packages, setup

setup(
    name="samdiffsr",
    version="0.1.0",
    description="SAM-DiffSR: structure-modulated diffusion for 4x super-resolution, trained at scale",
    packages=find_packages(include=["samdiffsr", "samdiffsr.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "deepspeed",
        "webdataset",
        "segment-anything",
        "pycocotools",
        "scikit-image",
        "scipy",
        "tensorboard",
        "submitit",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest", "ruff", "rotary-embedding-torch==0.5.3"]},
    entry_points={
        "console_scripts": [
            "samdiffsr-make-shards=samdiffsr.data.shardwriter:main",
            "samdiffsr-train=samdiffsr.train.engine:cli",
            "samdiffsr-submit=samdiffsr.cluster.slurm:main",
            "samdiffsr-benchmark=samdiffsr.evaluation.benchmark:main",
            "samdiffsr-infer=samdiffsr.evaluation.inference:main",
            "samdiffsr-demo=samdiffsr.demo:main",
        ]
    },
)
