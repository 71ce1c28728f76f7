"""Packaging for Apache Beam workers only: `--setup_file=./setup.py` in --beam_args ships histofold and
its runtime requirements (requirements.txt + TensorFlow, which writes the shards) to every Dataflow /
Flink worker. The project itself runs from the checkout (`make venv`); nothing else uses this file."""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
TENSORFLOW = "tensorflow-cpu==2.21.*"  # workers only encode and write records: no GPU


def requirements(name: str) -> list[str]:
    lines = (line.split("#")[0].strip() for line in (HERE / name).read_text().splitlines())
    return [line for line in lines if line]


setup(name="histofold", version="0.1.0", packages=["histofold"], python_requires=">=3.10",
      install_requires=requirements("requirements.txt") + [TENSORFLOW])
