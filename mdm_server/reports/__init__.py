"""Reports computed from the data as stored (already shaped by each device's policy)."""
