"""``vmshim compose``: multi-container applications from a compose file.

- :mod:`.loader`: find the files, read ``.env``, interpolate, merge ``-f`` overrides,
  validate (every refusal names the key's path), apply profiles → a :class:`.model.Project`.
- :mod:`.model`: the project and its services as typed, checked values.
- :mod:`.planner`: what containers, networks and volumes a project needs (names, labels,
  run options), and what to do about the ones that exist.
- :mod:`.runner`: does it, through the same library calls as ``vmshim run``/``rm``/….
"""
