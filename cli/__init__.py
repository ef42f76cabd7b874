"""Click command-line interface of mergekit-ext, installed as `mergekit_ext.cli`."""
