"""The text an LLM recommender reads: FELLRec's (Alpaca-style) instruction prompt per dataset.

Training text (BIGRec), with ``{items}``/``{item}``/``{verb}`` filled per dataset::

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    Given a list of movies the user has watched before, please recommend a new movie that the
    user likes to the user.

    ### Input:
    The user has watched the following movies before: "Title 1", "Title 2", ..., "Title 10"

    ### Response:
    "Target Title"<eos>

The text-encoder ranker reads only the input line (shorter, so faster). The released FELLRec
code indents its training template by 16 spaces but not its inference template; we use one
template for both.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER = ("Below is an instruction that describes a task, paired with an input that provides further "
          "context. Write a response that appropriately completes the request.")

# dataset name prefix -> (item, items, verb)
DOMAIN_WORDS: dict[str, tuple[str, str, str]] = {
    "ml-": ("movie", "movies", "watched"),
    "movielens": ("movie", "movies", "watched"),
    "amazon2018-Video_Games": ("video game", "video games", "played"),
    "amazon2023-Video_Games": ("video game", "video games", "played"),
    "amazon": ("product", "products", "bought"),
    "goodreads": ("book", "books", "read"),
    "microlens": ("micro-video", "micro-videos", "watched"),
}
GENERIC = ("item", "items", "interacted with")


@dataclass(frozen=True)
class Prompt:
    item: str
    items: str
    verb: str

    @classmethod
    def for_dataset(cls, dataset_name: str, item: str | None = None, items: str | None = None,
                    verb: str | None = None) -> Prompt:
        """The words for ``dataset_name`` (first matching prefix), each overridable."""
        words = next((w for prefix, w in DOMAIN_WORDS.items() if dataset_name.startswith(prefix)), GENERIC)
        return cls(item or words[0], items or words[1], verb or words[2])

    def history(self, titles: list[str]) -> str:
        """The input line: what the user interacted with, oldest first."""
        listed = ", ".join(f'"{t}"' for t in titles)
        return f"The user has {self.verb} the following {self.items} before: {listed}"

    def instruction(self, titles: list[str]) -> str:
        """Everything up to and including "### Response:\\n" (what generation starts from)."""
        task = (f"Given a list of {self.items} the user has {self.verb} before, please recommend a new "
                f"{self.item} that the user likes to the user.")
        return f"{HEADER}\n\n### Instruction:\n{task}\n\n### Input:\n{self.history(titles)}\n\n### Response:\n"

    def sequence_prefix(self) -> str:
        """The few tokens before the item vectors of the item-token backbone ("Movies watched:")."""
        return f"{self.items.capitalize()} {self.verb}:"

    @staticmethod
    def response(title: str) -> str:
        return f'"{title}"'

    @staticmethod
    def parse(generated: str) -> str:
        """The title in a generated response: first line, surrounding quotes and spaces removed."""
        text = generated.strip().split("\n", 1)[0].strip()
        if text.startswith('"'):
            end = text.find('"', 1)
            text = text[1:end] if end > 0 else text[1:]
        return text.strip()
