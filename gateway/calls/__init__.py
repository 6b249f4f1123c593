"""Crew calls: a guest's press becomes a call the crew's watches are told about, accept and complete."""
