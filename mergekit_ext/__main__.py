"""Run the `merge` command as `python -m mergekit_ext`."""

from mergekit_ext.cli.main import main

if __name__ == "__main__":
    main()
