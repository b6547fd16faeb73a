"""modules.processing: txt2img through our own pipeline on the stand-in model's parts.

Records, for each call, the prompt, the clip skip in effect and whether forward hooks (training
adapters) were live on the UNet, so tests can see that samples are rendered with them.
"""

from types import SimpleNamespace

from modules import calls, shared

records: list[dict] = []


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", steps=20, cfg_scale=7.0, seed=-1, width=512, height=512,
                 batch_size=1, sampler_name="Euler", do_not_save_grid=False, do_not_save_samples=False, do_not_reload_embeddings=False,
                 override_settings=None, override_settings_restore_afterwards=True):
        self.sd_model, self.prompt, self.negative_prompt = sd_model, prompt, negative_prompt
        self.steps, self.cfg_scale, self.seed, self.width, self.height = steps, cfg_scale, seed, width, height
        self.batch_size, self.sampler_name = batch_size, sampler_name
        self.override_settings = dict(override_settings or {})
        self.closed = False

    def close(self):
        self.closed = True


def process_images(p):
    from lib_lora.models.checkpoint import Checkpoint
    from lib_lora.models.pipeline import GenerationParams, generate

    stored = {k: shared.opts.data.get(k) for k in p.override_settings}
    shared.opts.data.update(p.override_settings)
    try:
        m = p.sd_model
        unet = m.model.diffusion_model
        hooked = any(module._forward_hooks for module in unet.modules())
        records.append({"prompt": p.prompt, "clip_skip": shared.opts.data["CLIP_stop_at_last_layers"], "hooks_live": hooked, "sampler": p.sampler_name})
        calls.append("process_images")
        if getattr(m, "is_sdxl", False):
            embedders = m.conditioner.embedders
            ckpt = Checkpoint(unet=unet, vae=m.first_stage_model, text_encoder=embedders[0].wrapped,
                              text_encoder_2=embedders[1].wrapped, arch="sdxl", parameterization=m.parameterization)
        else:
            ckpt = Checkpoint(unet=unet, vae=m.first_stage_model, text_encoder=m.cond_stage_model.wrapped,
                              arch="sd2" if m.is_sd2 else "sd1", parameterization=m.parameterization)
        params = GenerationParams(prompt=p.prompt, negative_prompt=p.negative_prompt, steps=p.steps, cfg_scale=p.cfg_scale, seed=p.seed,
                                  width=p.width, height=p.height, batch_size=p.batch_size,
                                  sampler=p.sampler_name.lower().replace(" ", "_"),  # "Euler a" -> euler_a
                                  clip_skip=shared.opts.data["CLIP_stop_at_last_layers"])
        images = generate(ckpt, params)
        shared.state.job_count, shared.state.job_no, shared.state.textinfo = 1, 1, "sampling"  # as processing does
    finally:
        shared.opts.data.update(stored)
    return SimpleNamespace(images=images, index_of_first_image=0)
