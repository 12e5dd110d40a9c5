"""synpref: synthetic preference datasets for text-to-image models.

One import namespace, ``synpref``, mapped from the top-level folders so that
the project never installs bare ``pipelines``/``transforms``/``schemas``/
``training`` modules (those names belong to unrelated PyPI projects).
This file is also what Beam's ``--setup_file`` ships to remote workers.
"""
from setuptools import setup

PACKAGES = {
    "synpref": "synpref",
    "synpref.pipelines": "pipelines",
    "synpref.transforms": "transforms",
    "synpref.transforms.rewards": "transforms/rewards",
    "synpref.transforms.generators": "transforms/generators",
    "synpref.schemas": "schemas",
    "synpref.runs": "runs",
    "synpref.jobs": "jobs",
    "synpref.training": "training",
    "synpref.training.families": "training/families",
    "synpref.core": "core",
    "synpref.cli": "cli",
    "synpref.formats": "formats",
    "synpref.reporting": "reporting",
    "synpref.demo": "demo",
}

setup(
    name="synpref",
    version="0.1.0",
    description="Synthetic ranked preference datasets (Syn-Pic) and RankDPO training for text-to-image models",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"synpref.jobs": ["*.yaml", "*.jsonl"], "synpref.transforms.rewards": ["*.npz"]},
    include_package_data=True,
    install_requires=[
        "apache-beam>=2.60",
        "torch>=2.1",
        "diffusers>=0.30",
        "transformers>=4.40",
        "peft>=0.11",
        "accelerate>=0.30",
        "open_clip_torch>=2.24",
        "webdataset>=0.2.90",
        "datasets>=2.19",
        "pyarrow>=14",
        "polars>=1.0",
        "fsspec>=2023.6",
        "pyyaml>=6",
        "safetensors>=0.4",
        "pillow>=10",
        "numpy>=1.24",
        "pydantic>=2.7",
    ],
    extras_require={
        "gcp": ["apache-beam[gcp]", "gcsfs"],
        "aws": ["s3fs"],
        "test": ["pytest>=7", "pytest-xdist>=3", "scikit-image>=0.19", "tensorboard>=2.10"],  # tensorboard: the trainer logs through it
    },
    entry_points={"console_scripts": ["synpref=synpref.cli:main"]},
)
