from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fastmt",
    version="0.1.0",
    description="Multi-teacher distillation (MT-BERT) for text classification and causal LMs, with fused kernels",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    keywords=["distillation", "knowledge distillation", "bert", "transformers", "triton", "pytorch"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    # fastmt/kernels/ holds links to the files of the top-level kernels/ folder (a wheel gets their contents):
    # kernels/ itself has no __init__.py, so from the repo root it never shadows Hugging Face's `kernels`.
    packages=find_packages(include=["fastmt", "fastmt.*"]),
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
        "datasets": ["datasets", "pyarrow"],  # parquet files, save_to_disk dirs and hub names as --train/--dev/--data
        "tensorboard": ["tensorboard"],  # --report-to tensorboard
        "onnx": ["onnx", "onnxscript", "onnxruntime"],  # fastmt export --format onnx, fastmt bench-serve
        # numpy < 2.4: Triton 3.6's CPU interpreter (how the kernels are tested) fails with numpy 2.4.
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.6", "numpy<2.4", "matplotlib", "tensorboard",
                 "datasets", "pyarrow", "onnx", "onnxscript", "onnxruntime"],
    },
    entry_points={"console_scripts": ["fastmt = fastmt.cli:main"]},
)
