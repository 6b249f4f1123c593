"""JSON API route handlers, grouped by resource."""
