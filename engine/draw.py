"""pycaffe's caffe.draw: `engine.draw.draw_net_to_file(net_param, "net.svg", "LR", phase)`
(phase None, engine.TRAIN or engine.TEST). The drawing lives in engine.tools.draw_net."""

from engine.tools.draw_net import draw_net_to_file, to_dot, to_svg  # noqa: F401
