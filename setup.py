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
        # numpy < 2.4: Triton 3.6's CPU interpreter (how the kernels are tested) fails with numpy 2.4.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.6", "numpy<2.4", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastmt = fastmt.cli:main"]},
)
