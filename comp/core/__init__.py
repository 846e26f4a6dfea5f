"""Infrastructure every stage uses: user errors, atomic files, claims (locks), worker pools, the device runtime, config fields, the metric, on-disk map stores and figures."""
