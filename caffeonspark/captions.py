"""CaffeOnSpark's image-captioning data tools (its COCO example): a COCO caption file as a
table of images and captions, a vocabulary of the captions' words, and the table an LRCN
net's CoSData layer trains on.

The formats are CaffeOnSpark's, so its vocabularies, tables and trained nets carry over:
- words: `sentence_words`, its tokenizer (runs of ASCII word characters, or of other
  characters, lower-cased, a final "." dropped);
- the vocabulary: a Spark text folder of one word a line, "UNK" first, then the words by
  falling count; a word's index is its line number;
- a caption as three INT_ARRAY columns of `caption_length` (`caption_arrays`):
  input_sentence (0 = start, then the words), cont_sentence (0, then 1 per word) and
  target_sentence (the words, then 0 = end), padded with -1. A word missing from the
  vocabulary takes index 1, as in CaffeOnSpark (where that is also its first word's index);
- an image as `data`, a struct of height, width and the file's bytes (binary here, where
  CaffeOnSpark wrote array<byte>; the CoSData layer reads both).

Where CaffeOnSpark skipped or crashed, these fail naming the row: an unreadable image file,
an index missing from the vocabulary.
"""

import re

from caffeonspark import storage
from caffeonspark.config import spark_session
from caffeonspark.sources import SourceError

START_END_ID = 0  # starts input_sentence, ends target_sentence
UNKNOWN_ID = 1  # a word the vocabulary does not hold
NO_TOKEN = -1  # padding
UNKNOWN_TOKEN = "UNK"

_TOKENS = re.compile(r"\w+|\W+", re.ASCII)  # java.util.regex's \w is ASCII

DATA_SCHEMA = "struct<height: int, width: int, image: binary>"
IMAGE_SCHEMA = f"id string, data {DATA_SCHEMA}, label int"
CAPTION_SCHEMA = (
    f"{IMAGE_SCHEMA}, input_sentence array<int>, cont_sentence array<int>, "
    "target_sentence array<int>"
)


def sentence_words(sentence):
    """The words of a caption, as CaffeOnSpark split them: 'A man, riding.' -> ['a', 'man',
    ',', 'riding']."""
    words = [t.strip().lower() for t in _TOKENS.findall(sentence.strip()) if t.strip()]
    if words and words[-1] == ".":
        words.pop()
    return words


def caption_arrays(words, word_index, length):
    """(input_sentence, cont_sentence, target_sentence) of a caption's words: at most
    length - 1 words are kept."""
    inputs, cont, target = ([NO_TOKEN] * length for _ in range(3))
    n = len(words) if len(words) < length else length - 1
    inputs[0], cont[0] = START_END_ID, 0
    for i, word in enumerate(words[:n]):
        index = word_index.get(word, UNKNOWN_ID)
        inputs[i + 1], cont[i + 1], target[i] = index, 1, index
    target[n] = START_END_ID
    return inputs, cont, target


class Vocab:
    """CaffeOnSpark's vocabulary: `genFromData` counts the words of a caption column, `save`
    writes them (one a line, "UNK" first), `load` reads such a file or folder back; a word's
    index is its line."""

    def __init__(self, spark_or_sc):
        self.spark = spark_session(spark_or_sc)
        self.words = []

    def genFromData(self, dataset, columnName, vocabSize=-1):
        """The words of `columnName` (strings), most frequent first (ties by word, so that
        the file is the same on every run), cut to vocabSize when it is positive."""
        counts = (
            dataset.select(columnName)
            .rdd.flatMap(lambda row: sentence_words(row[0] or ""))
            .map(lambda w: (w, 1))
            .reduceByKey(lambda a, b: a + b)
        )
        ranked = counts.sortBy(lambda wc: (-wc[1], wc[0]))
        words = ranked.keys().take(vocabSize) if vocabSize > 0 else ranked.keys().collect()
        self.words = [UNKNOWN_TOKEN] + words
        return self

    def save(self, vocabFilePath):
        """A Spark text folder (one part) at the path, as CaffeOnSpark wrote it."""
        sc = self.spark.sparkContext
        sc.parallelize(self.words, 1).saveAsTextFile(storage.absolute(vocabFilePath))

    def load(self, vocabFilePath):
        self.words = self.spark.sparkContext.textFile(storage.absolute(vocabFilePath)).collect()
        if not self.words:
            raise SourceError(f"vocabulary {storage.shown(vocabFilePath)} holds no word")
        return self

    def word2indexMap(self):
        return {w: i for i, w in enumerate(self.words)}

    def index2wordMap(self):
        return dict(enumerate(self.words))


def coco_image_captions(spark, caption_file, partitions=0):
    """A COCO caption (or image info) JSON file as rows of id, height, width, file, url and,
    where it has annotations, caption: one row per caption, its id the caption's (else one per
    image, its id the image's). url is flickr_url with captions, else coco_url, as in
    CaffeOnSpark."""
    from pyspark.sql import functions as F

    uri = storage.absolute(caption_file)
    df = spark.read.option("multiLine", True).json(uri)
    if "images" not in df.columns:
        raise SourceError(f"{storage.shown(uri)}: no 'images' list (not a COCO caption file)")
    images = df.select(F.explode("images").alias("i")).select("i.*")
    _require(images, ("id", "height", "width", "file_name"), "images", uri)
    captions = "annotations" in df.columns
    url = "flickr_url" if captions else "coco_url"
    images = images.select(
        F.col("id").cast("long").alias("image_id"),
        F.col("height").cast("int").alias("height"),
        F.col("width").cast("int").alias("width"),
        F.col("file_name").alias("file"),
        (F.col(url) if url in images.columns else F.lit(None)).cast("string").alias("url"),
    )
    if not captions:
        out = images.withColumnRenamed("image_id", "id")
    else:
        notes = df.select(F.explode("annotations").alias("a"))
        _require(notes.select("a.*"), ("image_id", "id", "caption"), "annotations", uri)
        notes = notes.select(
            F.col("a.image_id").cast("long").alias("image_id"),
            F.col("a.id").cast("long").alias("id"),
            F.col("a.caption").cast("string").alias("caption"),
        )
        out = images.join(notes, "image_id").select(
            "id", "height", "width", "file", "url", "caption"
        )
    return out.repartition(partitions) if partitions else out


def _require(df, fields, what, uri):
    missing = [f for f in fields if f not in df.columns]
    if missing:
        raise SourceError(f"{storage.shown(uri)}: the {what} have no {', '.join(missing)}")


def _embedding_rows(root, word_index, length):
    def task(rows):
        for row in rows:
            if not row["file"]:
                raise SourceError(f"row id {row['id']}: no image file name")
            path = storage.join(root, row["file"])
            try:
                image = storage.read_bytes(path, "image")
            except storage.StorageError as e:
                raise SourceError(f"row id {row['id']}: {e}") from None
            data = (row["height"], row["width"], image)
            if word_index is None:
                yield (str(row["id"]), data, 0)
            else:
                words = sentence_words(row["caption"] or "")
                yield (str(row["id"]), data, 0, *caption_arrays(words, word_index, length))

    return task


def image_embedding(image_root, image_caption_df):
    """id, data (height, width, the image file's bytes) and label 0 for every row of an
    image table (coco_image_captions without captions)."""
    spark = image_caption_df.sparkSession
    rows = image_caption_df.select("id", "file", "height", "width").rdd.mapPartitions(
        _embedding_rows(storage.absolute(image_root), None, 0)
    )
    return spark.createDataFrame(rows, IMAGE_SCHEMA)


def image_caption_embedding(image_root, image_caption_df, vocab, caption_length):
    """image_embedding plus input_sentence, cont_sentence and target_sentence of each row's
    caption (`caption_arrays` with the vocabulary's indices)."""
    if caption_length < 2:
        raise ValueError(f"captionLength {caption_length}: a caption needs at least 2 steps")
    spark = image_caption_df.sparkSession
    columns = image_caption_df.select("id", "file", "height", "width", "caption")
    rows = columns.rdd.mapPartitions(
        _embedding_rows(storage.absolute(image_root), vocab.word2indexMap(), caption_length)
    )
    return spark.createDataFrame(rows, CAPTION_SCHEMA)


def embedding_to_caption(embedding_df, vocab, embedding_column, caption_column):
    """id and a caption (words joined by spaces) from an index array column, the start / end
    index and padding left out; an index the vocabulary lacks fails naming the row."""
    index_word = vocab.index2wordMap()

    def caption(row):
        words = []
        for index in row[1] or ():
            if index in (START_END_ID, NO_TOKEN):
                continue
            if index not in index_word:
                raise SourceError(
                    f"row id {row[0]}: {embedding_column} holds {index}, beyond the "
                    f"vocabulary's {len(index_word)} words"
                )
            words.append(index_word[index])
        return (row[0], " ".join(words))

    rows = embedding_df.select("id", embedding_column).rdd.map(caption)
    return embedding_df.sparkSession.createDataFrame(rows, f"id string, {caption_column} string")


class Conversions:
    """CaffeOnSpark's Conversions, by its method names (each returns its DataFrame)."""

    def __init__(self, spark_or_sc):
        self.spark = spark_session(spark_or_sc)

    def Coco2ImageCaptionFile(self, src, clusterSize=0):
        return coco_image_captions(self.spark, src, clusterSize)

    def Image2Embedding(self, imageRootFolder, imageCaptionDF):
        return image_embedding(imageRootFolder, imageCaptionDF)

    def ImageCaption2Embedding(self, imageRootFolder, imageCaptionDF, vocab, captionLength):
        return image_caption_embedding(imageRootFolder, imageCaptionDF, vocab, captionLength)

    def Embedding2Caption(self, embeddingDF, vocab, embeddingColumn, captionColumn):
        return embedding_to_caption(embeddingDF, vocab, embeddingColumn, captionColumn)


DFConversions = Conversions  # the name of CaffeOnSpark's tools module's copy
