"""The load generator behind `derper bench`."""
