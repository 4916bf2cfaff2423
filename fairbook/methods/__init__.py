"""The methods of the handbook, one module per paper. Each method is declared once, as a :class:`Method` whose
fields are its own settings; :mod:`fairbook.protocol` trains and evaluates every method the same way.

=============  ===============================  =========  ============================================================
method         class                            chapter    paper
=============  ===============================  =========  ============================================================
CLIP           :class:`clip.CLIP`               11         Radford et al., ICML 2021 (the FairCLIP paper's baseline)
FairCLIP       :class:`fairclip.FairCLIP`       12         Luo et al., "FairCLIP", CVPR 2024
Fair-MoE       :class:`fair_moe.FairMoE`        13, 20-22  Wang et al., "Fair-MoE", Tables 1-4
FairMedFM      :class:`fairmedfm.FairMedFM`     14, 23     Jin et al., "FairMedFM", NeurIPS 2024 D&B, Table 2
               (usages x mitigations)
MultiFair      :class:`multifair.MultiFair`     16         Zubair et al., "MultiFair", arXiv 2510.07328
               (fundus + notes fusion)
SAM, SAMed     :class:`sam.SAM`                 15         FairMedFM's segmentation rows (Table 2); FEBS from
               (prompting, mitigations)                    Tian et al., "FairSeg", ICLR 2024
=============  ===============================  =========  ============================================================

Mitigations that apply to any method (resampling, GroupDRO) are in :mod:`fairbook.mitigations`. Each paper's main
claims, phrased as comparisons its chapters test, are its module's ``CLAIMS``; :data:`CLAIMS` gathers them for the
book's results-at-a-glance page.
"""
from fairbook.methods import fair_moe, fairclip, fairmedfm, multifair, sam
from fairbook.methods.base import Claim, Method, MethodError, method_from_record
from fairbook.methods.clip import CLIP
from fairbook.methods.fair_moe import FairMoE
from fairbook.methods.fairclip import FairCLIP
from fairbook.methods.fairmedfm import FairMedFM
from fairbook.methods.multifair import MultiFair
from fairbook.methods.sam import SAM

#: Every paper's claims, in the book's order.
CLAIMS: list[Claim] = [*fairclip.CLAIMS, *fair_moe.CLAIMS, *fairmedfm.CLAIMS, *sam.CLAIMS, *multifair.CLAIMS]

__all__ = ["CLAIMS", "CLIP", "Claim", "FairCLIP", "FairMedFM", "FairMoE", "Method", "MethodError", "MultiFair", "SAM",
           "method_from_record"]
