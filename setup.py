"""Ships `lowbit-autoregister.pth` into site-packages so that transformers finds lowbit's quantizers
in any process, even one that never imports lowbit (see src/lowbit/_import_hook.py)."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "lowbit-autoregister.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        shutil.copy(os.path.join("src", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
