"""Test stand-in for DomainBed (see tests/domainbed_stub/README.md)."""
