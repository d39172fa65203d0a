"""Shared pytest setup. Keep minimal; fixtures live in support.fixtures."""
import os

# Before llama_cpp (and its OpenMP runtime) can load: spin-waiting threads make decodes erratic on small VMs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

pytest_plugins = ["support.fixtures"]
