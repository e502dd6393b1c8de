"""Build script. The package is pure Python; the compiled extension fastgpt._C is added in csrc/."""

from setuptools import setup

setup()
