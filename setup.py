from setuptools import setup

setup(
    name="fastmt",
    version="0.1.0",
    description="Multi-teacher distillation (MT-BERT) for text classification, with fused kernels",
    python_requires=">=3.10",
    packages=["fastmt", "fastmt.kernels"],
    package_dir={"fastmt": "fastmt", "fastmt.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "transformers>=5,<6",
        "tokenizers",
        "safetensors",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.6", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastmt = fastmt.cli:main"]},
)
