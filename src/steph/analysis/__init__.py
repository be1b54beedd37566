"""The paper's analyses of a runs folder (method.md section 7), computed from the run
directories (and the data root where features are needed), cached under
``RUNS/.cache/analysis`` so that a long analysis resumes where it stopped:

- :mod:`~steph.analysis.runs`: which runs are finished, unfinished or missing; their logs,
  settings and provenance;
- :mod:`~steph.analysis.survival`: test patients split by predicted risk at the median of the
  training risks (Kaplan-Meier groups, log-rank test);
- :mod:`~steph.analysis.dynamics`: STEPH's w and lambda per epoch (Figures S1, S2) and which
  sources it selected on the test patients (``STEPH.explain``);
- :mod:`~steph.analysis.landscape`: the loss landscape of task-vector mixup (appendix C.2.3);
- :mod:`~steph.analysis.sar`: the subspace alignment ratio of tau_mix with tau_t (Figure 5);
- :mod:`~steph.analysis.attention`: attention maps of the target model and STEPH on test
  slides (Figure S4).

Figures are drawn by :mod:`steph.report`; this package only computes tables.
"""
