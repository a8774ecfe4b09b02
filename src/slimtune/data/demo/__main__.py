"""`python -m slimtune.data.demo`: regenerate the bundled demo files (byte-identical)."""

from slimtune.data.demo import write_demo_files

for path in write_demo_files():
    print(f"wrote {path}")
