"""CaffeOnSpark's captioning tools without Spark: its tokenizer and its caption arrays (the
Spark side, the COCO converter job, runs in test_spark_cluster)."""

import pytest

from caffeonspark.captions import caption_arrays, sentence_words


@pytest.mark.parametrize(
    "sentence, words",
    [
        ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
        ("  Two dogs, one cat... ", "two dogs , one cat ..."),
        ("It's a café.", "it ' s a caf é."),  # java's \w is ASCII: 'é.' is one token
        ("", ""),
        (".", ""),
    ],
)
def test_sentence_words_split_as_caffeonspark_did(sentence, words):
    assert sentence_words(sentence) == words.split()


def test_caption_arrays_start_end_and_padding():
    index = {"UNK": 0, "a": 1, "dog": 2, "runs": 3}
    inputs, cont, target = caption_arrays(["a", "dog", "jumps"], index, 6)
    assert inputs == [0, 1, 2, 1, -1, -1]  # start, then the words ("jumps" unknown: 1)
    assert cont == [0, 1, 1, 1, -1, -1]
    assert target == [1, 2, 1, 0, -1, -1]  # the words, then the end
    # a caption of length - 1 words or more keeps length - 1 of them
    inputs, cont, target = caption_arrays(["a", "dog", "runs", "a", "dog"], index, 4)
    assert inputs == [0, 1, 2, 3] and cont == [0, 1, 1, 1] and target == [1, 2, 3, 0]
