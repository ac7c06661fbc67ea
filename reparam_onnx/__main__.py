"""`python -m reparam_onnx`: the command line, with the same options and exit codes."""
from .cli import main

if __name__ == "__main__":   # a spawned batch worker imports this module too; it must not run main()
    main()
