"""``vmshim build``: Dockerfile → image, every RUN step in its own microVM.

dockerfile.py, words.py   parsing and checking; variable substitution (docker's rules)
builder.py                the build: stages, steps, config changes, cache, the result
runner.py, reap.py        RUN steps in a VM (or host namespaces) and their clean-up
diff.py                   overlay upper directory → OCI layer tar (whiteouts)
context.py, copy.py       the build context, .dockerignore, COPY/ADD layers
tree.py                   a virtual view of an image's layers; the layer tar writer
cache.py                  step cache keys and entries

See docs/building.md.
"""
