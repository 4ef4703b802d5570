r"""spark-submit entry point of CaffeOnSpark's CocoDataSetConverter: a COCO caption file and
its images as the table an image-captioning (LRCN) net's CoSData layer trains on.

    spark-submit jobs/coco2dataframe.py -imageRoot coco/train2014 \
        -captionFile coco/annotations/captions_train2014.json -output coco/parquet \
        [-embeddingDFDir df_embedded_train2014] [-vocabDir vocab] [-vocabSize 8800] \
        [-captionLength 20] [-imageCaptionDFDir df_image_caption_train2014] \
        [-outputFormat parquet|orc] [-clusterSize N]

Under -output it writes: -imageCaptionDFDir (if given, JSON): id, height, width, file, url,
caption, one row per caption; -vocabDir: the captions' words, one a line ("UNK" first, then
by falling count, cut to -vocabSize words when positive); -embeddingDFDir: id, data (height,
width and the image file's bytes), label, and each caption as input_sentence, cont_sentence
and target_sentence of -captionLength (see caffeonspark.captions). As in CaffeOnSpark, an
existing -vocabDir is read, not rebuilt: convert a validation set with the training set's
vocabulary by pointing both at it. A caption file without annotations (image info only)
gives id, data and label alone. The other outputs must not exist yet; the embedding's rows
are counted against the caption table, and an image file that cannot be read fails the job,
naming its row.
"""

import argparse
import logging
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from caffeonspark import Config, captions, export, storage  # noqa: E402
from caffeonspark.api import check_new_output, check_output, output_exists  # noqa: E402
from caffeonspark.launch import run_job  # noqa: E402

log = logging.getLogger("caffeonspark")


def parse(argv):
    p = argparse.ArgumentParser(
        prog="coco2dataframe.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("-imageRoot", required=True, help="the folder of the images (any URI)")
    p.add_argument("-captionFile", required=True, help="COCO caption JSON (any Spark path)")
    p.add_argument("-output", required=True, help="the folder the outputs go under")
    p.add_argument("-embeddingDFDir", default="embedding", help="the table for training")
    p.add_argument("-vocabDir", default="vocab", help="the vocabulary (read if it exists)")
    p.add_argument("-vocabSize", type=int, default=-1, help="words kept (<= 0: all)")
    p.add_argument("-captionLength", type=int, default=20, help="steps per caption (T)")
    p.add_argument("-imageCaptionDFDir", default="", help="also write the caption table here")
    p.add_argument("-outputFormat", default="parquet", choices=export.FORMATS)
    p.add_argument("-clusterSize", type=int, default=0, help="partitions (0: Spark's choice)")
    args = p.parse_args(argv)
    if args.captionLength < 2:
        p.error(f"-captionLength {args.captionLength}: a caption needs at least 2 steps")
    return args


def run(args, spark):
    def under_output(name, new=True):
        conf = Config(spark, output=f"{args.output.rstrip('/')}/{name}")
        return check_new_output(spark, conf) if new else check_output(spark, conf)

    embedding_uri = under_output(args.embeddingDFDir)
    table = captions.coco_image_captions(spark, args.captionFile, args.clusterSize).persist()
    try:
        rows = table.count()
        log.info("%d rows in %s", rows, storage.shown(args.captionFile))
        if args.imageCaptionDFDir:
            table.write.mode("error").json(under_output(args.imageCaptionDFDir))
        if "caption" in table.columns:
            vocab_uri = under_output(args.vocabDir, new=False)
            vocab = captions.Vocab(spark)
            if output_exists(spark, vocab_uri):
                vocab.load(vocab_uri)
                log.info("using the vocabulary at %s (%d words)", vocab_uri, len(vocab.words))
            else:
                vocab.genFromData(table, "caption", args.vocabSize).save(vocab_uri)
                log.info("vocabulary of %d words written to %s", len(vocab.words), vocab_uri)
            df = captions.image_caption_embedding(args.imageRoot, table, vocab, args.captionLength)
        else:
            df = captions.image_embedding(args.imageRoot, table)
        written = export.write_frame(df, embedding_uri, args.outputFormat, rows)
    finally:
        table.unpersist()
    print(f"{written} rows of {storage.shown(args.captionFile)} written to {embedding_uri}")
    return 0


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    return run_job("CocoDataSetConverter", lambda spark: run(args, spark))


if __name__ == "__main__":
    sys.exit(main())
