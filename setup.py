from setuptools import find_packages, setup

setup(
    name="megagnn",
    version="0.1.0",
    description="Megatron-style training of large graph neural network interatomic potentials",
    python_requires=">=3.10",
    packages=find_packages(include=["megagnn", "megagnn.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "ase>=3.23",
        "vesin>=0.3",
        "h5py",
        "pyyaml",
        "tqdm",
        "tensorboard",
        # process groups and (on GPU) DDP/optimizer; 0.17+ needs Python 3.12
        "megatron-core==0.16.1",
        "psutil",  # megatron-core needs it for dist_checkpointing but does not declare it
    ],
    extras_require={
        "test": ["pytest", "scipy"],
        "dev": ["pytest", "scipy", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "megagnn-pretrain=megagnn.pretrain:main",
            "megagnn-evaluate=megagnn.evaluate:main",
        ]
    },
)
