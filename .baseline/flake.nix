{
  description = "flash-sae: Triton kernels for training TopK-family sparse autoencoders";

  inputs.kernel-builder.url = "github:huggingface/kernels";

  outputs =
    { self, kernel-builder, ... }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
      pythonCheckInputs = ps: with ps; [ hypothesis ];
    };
}
