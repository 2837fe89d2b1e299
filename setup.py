"""Install samdiffsr: `pip install -e .` (add `[dev]` for the test tools)."""
from setuptools import find_packages, setup

setup(
    name="samdiffsr",
    version="0.1.0",
    description="SAM-DiffSR: structure-modulated diffusion for 4x super-resolution, trained at scale",
    # configs/*.yaml ship inside the package as samdiffsr/configs (samdiffsr.bundled finds them in a wheel and
    # in a source checkout alike), so that every console script works from a plain wheel install.
    packages=[*find_packages(include=["samdiffsr", "samdiffsr.*"]), "samdiffsr.configs"],
    package_dir={"samdiffsr.configs": "configs"},
    package_data={"samdiffsr.configs": ["*.yaml"]},
    python_requires=">=3.10",
    # Ranges, never exact pins: a cluster keeps its own CUDA build of torch. The versions CI tested are in the
    # README ("Tested versions"); the lower bounds are the oldest releases with the features used here.
    install_requires=[
        "torch>=2.4",  # fused Adam on CPU (found_inf: the non-finite skip); samdiffsr/train/versions.py
        "torchvision>=0.19",
        "numpy>=1.24",
        "pillow>=10.0",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "deepspeed>=0.18.0",  # engine.torch_autocast_z0_gradscaler (fp16 on ZeRO 0); samdiffsr/train/versions.py
        "webdataset>=0.2.86,<1.1",  # samdiffsr imports its internals (gopen, shardlists, tariterators)
        "segment-anything>=1.0",
        "pycocotools>=2.0.6",
        "scikit-image>=0.21",
        "scipy>=1.10",
        "tensorboard>=2.14",
        "submitit>=1.5",
        "matplotlib>=3.7",
        "zstandard>=0.19",  # shards store arrays zstd-compressed (format 2, docs/scaling.md)
    ],
    extras_require={"dev": ["pytest>=7", "ruff>=0.5", "rotary-embedding-torch>=0.5.3,<0.6",
                            "wheel>=0.40"]},  # wheel: tests/test_packaging.py builds one (no isolation)
    entry_points={
        "console_scripts": [
            "samdiffsr-make-shards=samdiffsr.demo.photos:make_shards_command",
            "samdiffsr-train=samdiffsr.train.engine:process_main",
            "samdiffsr-submit=samdiffsr.cluster.submit:main",
            "samdiffsr-benchmark=samdiffsr.evaluation.benchmark_cli:main",
            "samdiffsr-infer=samdiffsr.evaluation.infer_cli:main",
            "samdiffsr-demo=samdiffsr.demo:main",
            "samdiffsr-ablate=samdiffsr.ablation.cli:main",
        ]
    },
)
