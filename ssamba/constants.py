"""Values that several layers share (data, models, checkpoints, metrics); imports nothing of ours.

Keeping them here lets ``data`` and ``metrics`` agree on the CirCor classes without importing
each other, and lets checkpoint conversion know the front end's defaults without the data stack.
"""

SAMPLE_RATE = 16_000  # Hz: every clip is resampled to it before the fbank
MEL_BINS = 128  # frequency bins of the fbank front end (the encoders' default input_fdim)
AUDIOSET_MEAN = -4.2677393  # fbank statistics of AudioSet, used by the released pretraining
AUDIOSET_STD = 4.5689974
# The mel filterbank: kaldi's (and so AST's and SSAST's) range and FFT size at 16 kHz, and the data
# config keys that set them (a checkpoint records them: its features must be computed the same way).
MEL_LOW_HZ = 20.0
MEL_HIGH_HZ = SAMPLE_RATE / 2
FFT_SIZE = 512  # kaldi rounds the 400-sample window up to a power of two
MEL_KEYS = ("mel_low_hz", "mel_high_hz", "fft_size")
KALDI_MEL = (MEL_LOW_HZ, MEL_HIGH_HZ, FFT_SIZE)  # kaldi's scale, as values of MEL_KEYS

UNLABELED = ["unlabeled"]  # label_names of pretraining corpora: one class, all-zero targets

# PhysioNet Challenge 2022 (CirCor) classes, in the order the Challenge scores them
MURMUR_CLASSES = ("Present", "Unknown", "Absent")
OUTCOME_CLASSES = ("Abnormal", "Normal")
NO_OUTCOME = -1  # outcome index of a patient without an Outcome label
