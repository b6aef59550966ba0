#!/usr/bin/env python3
"""Vendor-compatible entry point: the same arguments as the vendor script, implemented by tvmzoo."""
import sys

from tvmzoo.cli import image2npz_main

if __name__ == "__main__":
    sys.exit(image2npz_main())
