"""`rackboot build deploy-env`: plugged into appliance.cli through the rackboot.commands entry point group."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deployenv import image
from deployenv.build import DEFAULT_CACHE, build
from deployenv.debian import BuildError
from deployenv.image_recipe import IMAGES
from deployenv.inputs import collect
from deployenv.register import RegisterError, config_lines, export, install, read_target

CACHE_ENV = "RACKBOOT_DEPLOYENV_CACHE"
IMAGE_CACHE_ENV = "RACKBOOT_IMAGE_CACHE"


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the build subcommand (and its deploy-env and image targets) to rackboot's parser."""
    b = sub.add_parser("build", help="build what the appliance serves to nodes (the deploy environment, images to deploy)")
    bsub = b.add_subparsers(dest="build_command", required=True)
    p = bsub.add_parser("deploy-env", help="the deploy kernel and initramfs, from Debian packages (mmdebstrap; needs root)")
    p.add_argument("--out", type=Path, help="also put vmlinuz and initrd.img in this directory")
    p.add_argument("--config", type=Path, help="rackboot.yaml: bake in its deploy key and install the result under its http.files")
    p.add_argument("--authorized-keys", type=Path, help="OpenSSH public key(s) the agent accepts (default with --config: STATE_DIR/deploy_key.pub)")
    p.add_argument("--tree-key", type=Path, help="private key the agents open the next tree-exec level with (baked in: anyone who "
                                                 "can download the initrd has it)")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE)),
                   help=f"where builds are kept, one directory per input hash (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--force", action="store_true", help="build again even when the cache has these inputs")
    p.set_defaults(func=_cmd_deploy_env)
    i = bsub.add_parser("image", help="a root filesystem to deploy (tar.zst) and its environment YAML, from Debian packages "
                                      "(mmdebstrap; needs root)")
    i.add_argument("image", choices=sorted(IMAGES), help="which image")
    i.add_argument("--out", type=Path, help="also put the image at this file (e.g. /srv/images/debian12.tar.zst) and its "
                                            "environment YAML beside it (same stem, .yaml)")
    i.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(IMAGE_CACHE_ENV, image.DEFAULT_CACHE)),
                   help=f"where builds are kept, one directory per recipe hash (default ${IMAGE_CACHE_ENV} or {image.DEFAULT_CACHE})")
    i.add_argument("--force", action="store_true", help="build again even when the cache has this recipe")
    i.set_defaults(func=_cmd_image)


def _keys(args: argparse.Namespace) -> tuple[str, bytes | None]:
    """Return (authorized_keys text, tree private key) from the arguments or the appliance's state."""
    if args.authorized_keys is not None:
        keys = args.authorized_keys.read_text()
    elif args.config is not None:
        key_path = read_target(args.config).deploy_key
        pub = Path(str(key_path) + ".pub")
        # The appliance makes its deploy key at first start; making it here first is the same key file.
        from broadcast.agent_client import load_or_create_key

        keys = pub.read_text() if pub.is_file() else load_or_create_key(key_path).export_public_key().decode()
    else:
        raise RegisterError("say which key the agent accepts: --authorized-keys FILE, or --config rackboot.yaml")
    import asyncssh  # here, not at the top: every `rackboot` command loads this module to register `build`

    tree: bytes | None = None
    if args.tree_key is not None:
        tree = args.tree_key.read_bytes()
        keys += "\n" + asyncssh.import_private_key(tree).export_public_key().decode()
    return keys, tree


def _cmd_deploy_env(args: argparse.Namespace) -> int:
    import asyncssh

    try:
        keys, tree = _keys(args)
        inputs = collect(keys, tree)
        result = build(inputs, args.cache_dir, say=lambda m: print(f"  {m}", flush=True), force=args.force)
        m = result.manifest
        sizes = f"vmlinuz {int(m['kernel_bytes']) / 1e6:.1f} MB, initrd.img {int(m['initrd_bytes']) / 1e6:.1f} MB"
        if result.cached:
            print(f"deploy environment {result.digest}: already built with these inputs, nothing to do ({sizes}; {result.directory})")
        else:
            print(f"deploy environment {result.digest}: built in {result.seconds:.0f}s ({sizes}, kernel {m['kernel_version']}; {result.directory})")
        if args.out is not None:
            for path in export(result.kernel, result.initrd, args.out, result.localboot):
                print(f"  wrote {path}")
        if args.config is not None:
            target = read_target(args.config)
            for path in install(result.kernel, result.initrd, target, result.localboot):
                print(f"  installed {path}")
            print(f"  {args.config} boots it as is (deploy.kernel {target.kernel}, deploy.initrds {list(target.initrds)})")
        else:
            print("copy vmlinuz, initrd.img and localboot-x64.efi under the appliance's http.files as deploy/vmlinuz, "
                  "deploy/initrd.img and deploy/localboot-x64.efi, "
                  "or run again with --config rackboot.yaml; rackboot.yaml:")
            print(config_lines(), end="")
    except (BuildError, RegisterError, OSError, ValueError, asyncssh.KeyImportError) as exc:
        print(f"rackboot build deploy-env: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_image(args: argparse.Namespace) -> int:
    recipe = IMAGES[args.image]
    try:
        result = image.build_image(recipe, args.cache_dir, say=lambda m: print(f"  {m}", flush=True), force=args.force)
        m = result.manifest
        sizes = (f"{result.tar.name} {int(m['tar_bytes']) / 1e6:.1f} MB, {int(m['unpacked_bytes']) / 1e6:.0f} MB unpacked, "
                 f"kernel {m['kernel_version']}")
        if result.cached:
            print(f"image {recipe.name} {result.digest}: already built with these inputs, nothing to do ({sizes}; {result.directory})")
        else:
            print(f"image {recipe.name} {result.digest}: built in {result.seconds:.0f}s ({sizes}; {result.directory})")
        env_file = result.yaml
        if args.out is not None:
            tar, env_file = image.export(result, args.out, recipe)
            print(f"  wrote {tar}\n  wrote {env_file}")
        print(f"add it to the catalog: rackboot env add {env_file}")
    except (BuildError, OSError) as exc:
        print(f"rackboot build image: {exc}", file=sys.stderr)
        return 1
    return 0
