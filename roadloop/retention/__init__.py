"""Retention and erasure of camera data (framework-free; docs/retention.md).

- ``policy``: how long each kind of data is kept and which frames expire.
- ``ledger``: the privacy folder: erasure journals, the exclusion list, the audit log and
  the frame keys each curated dataset version holds.
- ``erasure``: an erasure request (camera, time range), validated, journalled and audited.
"""
