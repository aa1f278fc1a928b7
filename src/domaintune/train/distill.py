"""Knowledge distillation: the student learns the teacher's token distributions (KL) plus the labels (CE)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import Trainer

from domaintune.errors import UserError
from domaintune.model.config import ModelConfig
from domaintune.model.loader import is_adapter_dir, load_trained, resolve_model_dir
from domaintune.registry.uri import is_registry_uri
from domaintune.train.init_from import config_relative, resolve_model_reference

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


def load_teacher(ref: str, cfg: ProjectConfig, student):
    """A teacher from a name/folder/hub id, a trained model/ folder (adapter merged), or registry:// uri."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_reference(ref, cfg) if is_registry_uri(ref) else config_relative(ref, cfg)
    if path.is_dir() and (is_adapter_dir(path) or (path / "domaintune.json").is_file()):
        teacher, _ = load_trained(path, merge=True)
    else:
        teacher_dir = resolve_model_dir(ModelConfig(name_or_path=str(path) if path.exists() else ref))
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise UserError(
            f"train.distill.teacher: vocabulary size {teacher_vocab} differs from the student's {student_vocab}; "
            "logit distillation needs a shared tokenizer"
        )
    teacher.config.use_cache = False
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad = False
    return teacher


class DistillTrainer(Trainer):
    """Trainer whose training loss is alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE on assistant tokens.

    Evaluation reports plain CE, so val loss is comparable with the other methods.
    """

    def __init__(self, *args, teacher, alpha: float, temperature: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        import torch
        import torch.nn.functional as F

        outputs = model(**inputs)
        ce = outputs.loss
        if not model.training or self.alpha == 0:
            return (ce, outputs) if return_outputs else ce
        teacher_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            teacher_logits = self.teacher(**teacher_inputs).logits
        mask = inputs["labels"][:, 1:] != -100
        t = self.temperature
        student = outputs.logits[:, :-1][mask].float() / t
        teacher = teacher_logits[:, :-1][mask].float() / t
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        loss = self.alpha * kl * t * t + (1 - self.alpha) * ce
        return (loss, outputs) if return_outputs else loss
