"""Packaging for refinestyle-kernels: the fused op (refinestyle_kernels) and the model package (refinestyle)."""
from setuptools import find_packages, setup

setup(
    name="refinestyle-kernels",
    version="0.1.0",
    description=(
        "Fused Triton kernels for StyleGAN2's modulated convolution with RefineStyle's "
        "low-rank kernel residuals, and a thin model package for inversion and domain adaptation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["refinestyle_kernels*", "refinestyle*", "benchmarks*"]),
    install_requires=[
        "torch>=2.4",
        # Triton ships with torch on Linux; elsewhere only the torch backend is available.
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        # Losses and feature extractors used by the inverters and the domain adapters.
        "train": ["torchvision", "lpips", "open_clip_torch"],
        "dev": [
            "torchvision",
            "lpips",
            "open_clip_torch",
            "pytest",
            "pytest-benchmark",
            "pytest-timeout",
            "pytest-xdist",
            "ninja",
            # tests only: refinestyle.fid is checked against pytorch-fid's own network and distance
            "pytorch-fid",
        ],
    },
    entry_points={
        "console_scripts": [
            "refinestyle=refinestyle.cli:main",
            "refinestyle-bench=benchmarks.__main__:main",
        ]
    },
)
