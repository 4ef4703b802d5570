"""Command-line tools of the engine, run as `python -m engine.tools.<name>` (Caffe's tools/:
convert_imageset, compute_image_mean, upgrade_net_proto_text, draw_net, ...)."""
