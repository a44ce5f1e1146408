"""Location history analysis: trips, stops, days and named places, from the
locations as stored (already shaped by the policy). Pure: no I/O, no asyncio; the
API (mdm_server/api/trips.py) reads, opens and hands the points in."""
