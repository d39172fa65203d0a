"""Generate kvmerge_local/data/sample.pdf, the demo document (run once; the PDF is committed).

Needs fpdf2 (``pip install fpdf2``), which is only a tool for this script, not a runtime dependency.
Three pages of a fictional report with facts on each page, so questions can cite pages.  Page 2 also
holds one fact in the form the embedded default model was trained to retrieve (kvmerge_local/train/data.py:
"The special magic word for KEY is VALUE.", KEY and VALUE single tokens of its vocabulary).
"""
from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

PAGES = [
    ("Lake Varnett Water Survey 2025 - Summary",
     "This report describes the water survey of Lake Varnett, a small glacial lake in the northern hills, "
     "carried out by the Varnett Valley Field Station between April and September 2025. The survey team had "
     "six members and was led by the hydrologist Dr. Ilse Marrow. The lake covers 3.4 square kilometres and "
     "its deepest point, measured in June, is 41 metres. Two streams feed the lake: the Corrin Brook from the "
     "west and the much smaller Tal Brook from the north. The only outflow is the Varnett River at the south "
     "end, next to the old mill. The purpose of the survey was to find out why the water had turned cloudy in "
     "the summer of 2024 and whether the trout population was at risk. Measurements were taken every two weeks "
     "at twelve fixed stations marked with yellow buoys. At each station the team recorded temperature, "
     "dissolved oxygen, acidity, clarity and the concentration of nitrates and phosphates."),
    ("Findings",
     "The water was clearest in April, when a white disc lowered into the lake stayed visible down to 7.5 "
     "metres. By the middle of August the same disc disappeared at 2.1 metres. The cloudiness came from a "
     "bloom of green algae that started near the mouth of the Corrin Brook and spread east. Phosphate levels "
     "in the Corrin Brook were four times higher than in the Tal Brook. The team traced the phosphate to a "
     "drainage ditch from the Hallow Farm fields, which had been fertilised heavily in May. Surface water "
     "temperature peaked at 23 degrees Celsius on the 9th of August, the warmest reading in the station's "
     "records. Dissolved oxygen near the bottom fell below 4 milligrams per litre at three of the twelve "
     "stations in late August, which is stressful for trout. The trout count itself, made with nets in "
     "September, found 312 fish, down from 355 in 2023. Acidity stayed normal all season, between pH 7.1 "
     "and pH 7.6. For the station archive, the team wrote one line in the log: The special magic word for "
     "water is mill."),
    ("Recommendations",
     "The report makes three recommendations. First, a strip of reeds and willows ten metres wide should be "
     "planted along the drainage ditch from Hallow Farm, to catch phosphate before it reaches the Corrin "
     "Brook; the farm has agreed to this and planting is planned for March 2026. Second, the field station "
     "should add a bottom oxygen sensor at station 7, the deepest station, and report readings weekly from "
     "June to September. Third, fishing should be limited to catch-and-release in August, when the water is "
     "warmest and oxygen is lowest. The total cost of the measures is estimated at 18,500 euros, of which the "
     "regional water board will pay 12,000 euros. The next full survey is scheduled for 2027. Questions about "
     "this report can be sent to the Varnett Valley Field Station, attention of Dr. Ilse Marrow."),
]


def main(out: str | None = None) -> Path:
    from fpdf import FPDF

    path = Path(out) if out else Path(__file__).resolve().parent.parent / "kvmerge_local" / "data" / "sample.pdf"
    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime(2025, 10, 1, tzinfo=timezone.utc))  # fixed: reproducible bytes
    pdf.set_title("Lake Varnett Water Survey 2025")
    pdf.set_author("Varnett Valley Field Station (fictional)")
    for title, body in PAGES:
        pdf.add_page()
        pdf.set_font("Helvetica", "B", 16)
        pdf.multi_cell(0, 10, title)
        pdf.ln(4)
        pdf.set_font("Helvetica", size=12)
        pdf.multi_cell(0, 7, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))
    print(path)
    return path


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
