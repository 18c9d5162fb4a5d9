"""Tests of the WBC agent package (gr2_wbc)."""
