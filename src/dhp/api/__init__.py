"""HTTP API: the FHIR REST endpoint, SSO routes and start-up wiring."""

from dhp.api.app import create_app

__all__ = ["create_app"]
