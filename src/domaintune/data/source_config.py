"""Where the data stage's rows come from: `data.sources[*]` (also `data.augment`'s records_to_dialogue source)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from domaintune.utils.config_types import ConfigPath, StrictModel

ReaderName = Literal[
    "auto",
    "csv",
    "tsv",
    "json",
    "jsonl",
    "parquet",
    "excel",
    "xml",
    "pdf",
    "docx",
    "sql",
    "dataset_info",
    "alpaca",
    "sharegpt",
    "messages",
    "annotations",
]

FieldRef = str | list[str]


class FieldMap(StrictModel):
    """Where each training field comes from, by source column / key / XML path.

    A list of columns is joined with a blank line (e.g. `instruction: [title, ask]`).
    Use `instruction`/`input`/`output` for single-turn rows, `messages` for a column
    already holding a chat, or `text` for raw text records (PDF, DOCX).
    """

    instruction: FieldRef | None = Field(None, description="Column(s) forming the user instruction.")
    input: FieldRef | None = Field(None, description="Column(s) forming the optional extra input.")
    output: FieldRef | None = Field(None, description="Column(s) forming the assistant answer.")
    system: FieldRef | None = Field(None, description="Column holding a per-row system prompt.")
    messages: str | None = Field(None, description="Column holding a list of {role, content} messages.")
    text: FieldRef | None = Field(None, description="Column(s) of raw text (documents); rows become `text` rows.")
    id: str | None = Field(None, description="Column holding a stable row id (default: file + line/record).")


class SourceConfig(StrictModel):
    name: str | None = Field(
        None, description="Source name in the report and in each row's `source` (default: file stem)."
    )
    path: ConfigPath | None = Field(None, description="A file, a folder (with `glob`) or, for sql, unused.")
    glob: str = Field("**/*", description="Files to read when `path` is a folder (sorted; e.g. `**/*.xml`).")
    reader: ReaderName = Field("auto", description="Reader; `auto` picks by file extension.")
    encoding: str | None = Field(None, description="Text encoding; default: auto-detected (charset-normalizer).")
    delimiter: str | None = Field(None, description="CSV delimiter (default `,`; `\\t` for tsv).")
    max_record_lines: int = Field(
        100,
        ge=1,
        description="CSV/TSV: most lines one record may span (quoted fields with line breaks). A longer record, or "
        "one that reaches the end of the file inside quotes (an unbalanced quote), is quarantined at its first line "
        "and reading goes on with the next line.",
    )
    sheet: str | int | None = Field(None, description="Excel sheet name or index (default: the first).")
    record_path: str | None = Field(
        None, description="XML: XPath of one record relative to the root (e.g. `.//QAPair`)."
    )
    json_records: str | None = Field(None, description="JSON: dotted key of the record list inside the document.")
    url: str | None = Field(None, description="SQL: sqlalchemy URL, e.g. `sqlite:///data/qa.db`.")
    query: str | None = Field(None, description="SQL: the query returning one row per record.")
    datasets: list[str] | None = Field(None, description="dataset_info: which entries to read (default: all).")
    pages: Literal["document", "page"] = Field("document", description="PDF: one record per document or per page.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Field mapping (defaults depend on the reader).")
    keep: list[str] | dict[str, str] = Field(
        default_factory=list, description="Extra columns/XML paths to keep on each row (list, or {name: path})."
    )

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.reader == "sql":
            if not self.url or not self.query:
                raise ValueError("reader sql needs `url` and `query`")
        elif self.path is None:
            raise ValueError("`path` is required (except for reader sql)")
        if self.reader == "xml" and not self.record_path:
            raise ValueError("reader xml needs `record_path` (e.g. `.//QAPair`)")
        return self

    def keep_map(self) -> dict[str, str]:
        return dict(self.keep) if isinstance(self.keep, dict) else {k: k for k in self.keep}
