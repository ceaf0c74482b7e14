"""Geography: great-circle distance, Natural Earth countries, regions, offline reverse geocoding."""
