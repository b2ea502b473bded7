"""The read side of kdarena: the runs MLflow holds, ranked, with the published results beside them.

Pure functions over data frames, shared by `kdarena leaderboard` and the
dashboard so both show one ranking: `runs` reads the record, `board` ranks
it (with `stats`: the Pareto front, the spread and CI over seeds, the paired test against the
student alone, and what "best" means), `references`
holds the published figures (`references.csv`, cited in `sources.yaml`),
`text` and `render` turn rows into tables, Markdown, CSV and JSON, and
`sweeps` answers the dashboard's sweep pages. No Streamlit, no Ray, no torch.

`kdarena leaderboard --export leaderboards/` writes one Markdown file per
dataset here (``digits.md``, ...), our ranking followed by the published rows.
"""
