"""``tokenbench visualize``: which patches each token stands for, drawn.  Data flows one way:

- :mod:`tokenbench.visual.inputs`: the images (a dataset's, or image files) and what to show;
- :mod:`tokenbench.visual.trace`: a forward with the source map on, analysed stage by stage
  (which original patches each token stands for); the only place that reads the model's geometry;
- :mod:`tokenbench.visual.draw`: matplotlib panels and sheets from traces (it runs no model);
- :mod:`tokenbench.visual.budget`: the method's budget knob at matched FLOPs, and the FLOPs shown;
- :mod:`tokenbench.visual.sheets`: the two pictures, from model name to figure file.
"""
