"""What both interpreters of 医保小智 share: the hub's (Python 3.11) and the Rasa venv's (Python 3.10).

- ``spoken``: numbers, dates and amounts as a person reads them aloud (every spoken reply);
- ``masking``: which numbers are personal (身份证号, phone, bank and insurance cards) and how they are
  masked, credentials in log lines, and the stdlib ``logging`` filter that applies both;
- ``places``: GB/T 2260 region codes and the place and relation words residents use;
- ``ports``: the RTP port-range rule the settings and the SIP demo both check.

The package's contract (tests/core/test_shared_package.py and the import-linter contracts in
pyproject.toml check it): standard library only, Python 3.10 syntax, and no import of any other
package of this project. It is the bottom layer: everything may import it, it imports nothing of ours.
"""
