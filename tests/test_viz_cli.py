"""``cnnlab visualize``: every method writes its figures; every user mistake is one line and exit 2."""

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cnnlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def pngs(capsys):
    lines = capsys.readouterr().out.splitlines()
    paths = [line.removeprefix("wrote ") for line in lines if line.startswith("wrote ")]
    assert paths, lines
    images = [Image.open(p) for p in paths]
    for img in images:
        assert img.format == "PNG" and img.size[0] > 300 and len(img.getcolors(1 << 20) or range(500)) > 50
    return paths


@pytest.mark.parametrize("argv, names", [
    (["filters"], ["conv1.png", "conv1_filter0.png"]),
    (["filters", "--layer", "conv3_x", "--channel", "2"], ["conv3_x.png", "conv3_x_filter2.png"]),
    (["features", "--index", "7", "--layer", "conv1", "conv5_x", "layer3.0.left.2"],
     ["conv1_test7.png", "conv5_x_test7.png", "layer3-0-left-2_test7.png"]),
    (["cam", "--count", "2", "--target", "cat"], ["conv5_x_test0+1.png"]),
    (["attribute", "--index", "3", "--kind", "saliency", "occlusion", "smoothgrad", "guided-grad-cam"],
     ["test3.png"]),
    (["top-images", "--layer", "conv4_x", "--channel", "1", "--count", "4"], ["conv4_x_ch1.png"]),
    (["deconv", "--index", "5", "--count", "2"], ["conv5_x_test5.png"]),
    (["invert", "--layer", "conv1", "conv3_x", "--steps", "5"], ["test0.png"]),
    (["maximize", "--layer", "conv4_x", "--channel", "0", "3", "--steps", "5"], ["conv4_x_ch0-3.png"]),
    (["maximize", "--target", "cat", "ship", "--steps", "5"], ["classes.png"]),
    (["dream", "--steps", "2"], ["conv4_x_test0.png"]),
    # Every value of a multi-valued flag is drawn: a figure per layer, per filter, per channel.
    (["filters", "--layer", "conv1", "conv2_x", "--channel", "0", "1"],
     ["conv1.png", "conv1_filter0.png", "conv1_filter1.png", "conv2_x.png", "conv2_x_filter0.png",
      "conv2_x_filter1.png"]),
    (["cam", "--index", "3", "--layer", "conv4_x", "conv5_x", "--target", "cat", "ship", "--kind", "grad-cam"],
     ["conv4_x_test3.png", "conv5_x_test3.png"]),
    (["top-images", "--layer", "conv3_x", "conv4_x", "--channel", "1", "--count", "2"],
     ["conv3_x_ch1.png", "conv4_x_ch1.png"]),
    (["deconv", "--index", "5", "--layer", "conv4_x", "conv5_x", "--channel", "0", "1"],
     ["conv4_x_test5.png", "conv5_x_test5.png"]),
    (["maximize", "--layer", "conv3_x", "fc", "--channel", "1", "2", "--steps", "2"],
     ["conv3_x_ch1-2.png", "classes.png"]),
    (["dream", "--layer", "conv3_x", "conv4_x", "--steps", "1"], ["conv3_x_test0.png", "conv4_x_test0.png"]),
])
def test_every_method_writes_its_figures(small_run, capsys, argv, names):
    method = argv[0]
    assert main(["visualize", method, str(small_run), *argv[1:]]) == 0
    paths = pngs(capsys)
    assert [p.rsplit("/", 1)[1] for p in paths] == names
    assert all(p.startswith(str(small_run / "viz" / method)) for p in paths)


def test_several_targets_give_each_image_a_row_for_each(small_run):
    from cnnlab.inspect import Choices, Inspection, show
    from cnnlab.visualize.figures import draw

    (result,) = show(Inspection.open(small_run, device="cpu"), "cam",
                     Choices.of(target=[3, 8], kind=["grad-cam", "layer-cam"], index=[1, 2]))
    assert result.rows == [0, 0, 1, 1] and result.targets.tolist() == [3, 8, 3, 8]
    (figure,) = draw(result).values()
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 4 * 3  # (image, target) rows; the image and two CAMs a row
    assert [t.split("\n")[0] for t in titles[::3]] == ["test1", "test1", "test2", "test2"]
    shown = [t.splitlines()[-1] for t in titles[::3]]
    assert all(line.startswith(("target ", "true ", "pred ")) for line in shown)
    assert sum(line in ("target cat", "target ship") for line in shown) >= 2


def test_features_show_every_conv5_x_channel_beside_an_image_file(small_run, tmp_path, capsys):
    # A large grayscale JPEG, resized and given three channels as the checkpoint says.
    photo = tmp_path / "photo.jpg"
    Image.linear_gradient("L").resize((300, 200)).save(photo)
    out = tmp_path / "figs"
    assert main(["visualize", "features", str(small_run), "--image", str(photo), "--layer", "conv5_x",
                 "--out", str(out), "--tensorboard"]) == 0
    (path,) = pngs(capsys)
    assert path == str(out / "conv5_x_photo.png")
    acc = EventAccumulator(str(small_run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "viz/features/conv5_x_photo" in acc.Tags()["images"]


@pytest.mark.parametrize("argv, words", [
    (["visualize", "umap", "RUN"], ["unknown method 'umap'", "filters", "features", "cam", "attribute", "dream"]),
    (["visualize", "cam", "RUN", "--layer", "conv6_x"], ["unknown layer 'conv6_x'", "conv1", "conv5_x", "fc",
                                                         "layer4"]),
    (["visualize", "features", "RUN", "--layer", "layer9.0"], ["unknown layer", "conv2_x"]),
    (["visualize", "cam", "RUN", "--target", "unicorn"], ["unknown class 'unicorn'", "airplane", "truck"]),
    (["visualize", "cam", "RUN", "--target", "12"], ["out of range", "0 … 9"]),
    (["visualize", "cam", "RUN", "--kind", "grad-cam+++"], ["grad-cam", "grad-cam++", "score-cam", "layer-cam"]),
    (["visualize", "attribute", "RUN", "--kind", "lime"], ["saliency", "integrated-gradients", "occlusion"]),
    (["visualize", "features", "RUN", "--index", "5000"], ["--index 5000 is out of range", "200 images"]),
    (["visualize", "filters", "RUN", "--channel", "99"], ["--channel 99 is out of range", "8 filters"]),
    (["visualize", "deconv", "RUN", "--channel", "99"], ["--channel 99 is out of range", "64 channels"]),
    (["visualize", "features", "RUN", "--target", "cat"], ["features does not use --target", "--index", "--layer"]),
    (["visualize", "cam", "RUN", "--steps", "3"], ["cam does not use --steps"]),
    (["visualize", "attribute", "RUN", "--layer", "conv4_x", "conv5_x"], ["one --layer", "guided-grad-cam"]),
    (["visualize", "attribute", "RUN", "--kind", "saliency", "--layer", "conv4_x"],
     ["--layer is used by the guided-grad-cam attribution alone"]),
    (["visualize", "maximize", "RUN", "--target", "cat", "--channel", "1"], ["--target", "--channel", "not both"]),
    (["visualize", "features", "RUN", "--image", "BAD"], ["cannot read image", "PNG", "JPEG"]),
    (["visualize", "features", "RUN", "--image", "MISSING"], ["cannot read image", "no such file"]),
    (["visualize", "cam", "RUN", "--layer", "fc"], ["not feature maps", "conv5_x"]),
    (["visualize", "filters", "RUN", "--layer", "pool"], ["no convolution", "conv1"]),
    (["visualize", "features", "NO_SUCH_RUN"], ["does not exist"]),
])
def test_user_mistakes_are_one_line_and_exit_2(small_run, tmp_path, capsys, argv, words):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    argv = [{"RUN": str(small_run), "BAD": str(bad), "MISSING": str(tmp_path / "gone.jpg"),
             "NO_SUCH_RUN": str(tmp_path / "nothing")}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
