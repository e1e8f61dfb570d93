# The repo root on sys.path for the tests (scripts import model, weighting, ... as top-level modules).
