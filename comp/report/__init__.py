"""Reports: the leaderboard, the HTML report and data-set statistics."""
